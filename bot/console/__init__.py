"""The command line (`cli`: `python -m bot …`, the `dbops-bot` entry point), the console
frontend that runs commands and approvals without Slack (`console`) and the demo
(`demo`, `demo_incident`).

May import: anything in `bot` and `commands`; nothing imports it but `bot.__main__`.
"""
