"""The guest agent (``sockmap agent``), run inside a VM or another machine.

It watches the guest's listeners (``sockmap.portwatch``) and either prints them
(``--print``, ``main``) or reports them to the host daemon over TCP, vsock or a unix
socket (``--connect``, ``link``). It never imports the daemon (``sockmap.daemon``).
"""
