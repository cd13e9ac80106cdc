"""Delivering: one attempt over SMTP (with OAuth tokens where set), pausing, and whether mail would flow."""
