"""itpn/engine."""
