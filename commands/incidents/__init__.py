"""`/db incident …`, the pure half: the arguments of every verb, the SLA arithmetic and the
timeline and header texts (`lifecycle`), and the arguments of the communications verbs,
`template` and `summary` (`comms`). No Slack, no state store: `bot.incidents` keeps
incidents and speaks; everything here is a function of its inputs.

May import: `commands.base`; nothing of `bot`.
"""
