"""Incidents: the service (start, update, resolve, SLA clocks and reminders), their comms
(templates, summary, recovery marking), the facts and views they show, the watchdog that
runs health on a schedule and its leader election.

May import: `bot.approvals`, `bot.access`, `bot.messages`, `bot.state`, the plain modules of
`bot` and `commands`.
"""
