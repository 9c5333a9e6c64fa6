"""What the bot says and how: Block Kit rendering (`render`), the notifiers that post it to
Slack or print it on the console (`notify`), and the signed values of buttons (`keyed_mac`).

May import: the plain modules of `bot` and `commands`; nothing of the floors above.
"""
