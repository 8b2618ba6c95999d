"""itpn/objectives."""
