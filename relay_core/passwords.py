"""One password policy for the admin account, shared by the Admin account card and the CLI.

The list of refused passwords is short on purpose: it stops an online attack's
first guesses, which the sign-in lockout then slows.
"""

from __future__ import annotations

from .store.accounts import WELL_KNOWN_PASSWORDS

MIN_LENGTH = 8

COMMONEST = frozenset("""
password password1 password12 password123 password! passw0rd p@ssword p@ssw0rd
12345678 123456789 1234567890 0123456789 11111111 00000000 12341234 87654321 88888888 12121212
qwertyui qwertyuiop qwerty123 qwerty12 1qaz2wsx asdfghjk asdfasdf zxcvbnm1 1q2w3e4r 1q2w3e4r5t
abcd1234 abc12345 abcdefgh aa123456 a1b2c3d4 iloveyou iloveyou1 sunshine princess football
baseball superman batman12 starwars whatever trustno1 welcome1 welcome123 letmein1 letmein123
changeme changeme1 admin123 admin1234 administrator adminadmin rootroot secret123 master12
monkey12 dragon12 michael1 jennifer computer internet shadow12 charlie1 jordan23 football1
""".split()) | WELL_KNOWN_PASSWORDS


def password_problem(password: str, seed: str | None = None) -> str | None:
    """What is wrong with ``password`` as a new admin password, in one sentence; None when nothing.
    ``seed``: the first-boot password, which sits in setup files."""
    if len(password) < MIN_LENGTH:  # what is wrong, not the field's hint ("At least 8 characters") again
        return f"Too short: {len(password)} character{'s' if len(password) != 1 else ''}, fewer than {MIN_LENGTH}."
    if password.lower() in COMMONEST or (seed is not None and password == seed):
        return "That password is in the setup files or widely known; choose another."
    return None
