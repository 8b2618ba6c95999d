"""itpn/data."""
