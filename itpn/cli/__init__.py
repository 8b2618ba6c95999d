"""itpn/cli."""
