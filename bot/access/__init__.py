"""Who may do what: roles from ROLE_MAP, Slack user groups and LEAPS `users.role`, cached,
remembered in the state store, and the refusals that say why (`roles`).

May import: `bot.state`, `bot.messages`, the plain modules of `bot` and `commands`.
"""
