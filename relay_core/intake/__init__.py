"""Finding what to send: the group commit of accepted messages, and the relay's own test email."""
