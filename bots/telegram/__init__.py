"""The Telegram front end: wiring (`app`), handlers, references, reply, flood limits."""
