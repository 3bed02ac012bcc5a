"""NAT'd network-namespace guests: netns, veth, addresses, routes, masquerade, DNS."""
