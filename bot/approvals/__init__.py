"""The approval rules of DESIGN.md: the engine (request, preflight, clicks, execution at most
once, the sweeper), the executor (one guarded transaction on the admin DSN, the rolled-back
try) and the LEAPS identity a remedy acts as.

May import: `bot.access`, `bot.messages`, `bot.state`, the plain modules of `bot` and
`commands`.
"""
