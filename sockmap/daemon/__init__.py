"""The host daemon (``sockmap daemon``): one process for every guest.

Its lifecycle (``service``), what it knows of guests (``registry``), the replanner
(``planner``, which asks ``conflicts`` for every decision), the netns guests it watches
itself (``nswatch``, ``attachments``, ``discover``), the VM agents' sessions (``agents``),
the control socket (``ctlserver``), metrics, reverse forwards. Nothing here is imported by
the VM agent (``sockmap.agent``).
"""
