"""What pagoda needs to know about the machine it runs on, chosen once per engine."""
