"""The Slack frontend: the Bolt app and its listeners (`app`), HTTP and Socket Mode serving
with /healthz and /metrics (`server`), exports uploaded to Slack (`exports`) and the worker
processes that share one port (`workers`).

May import: every floor below it (`bot.house`, `bot.incidents`, `bot.approvals`,
`bot.access`, `bot.messages`, `bot.state`, the plain modules) and `commands`.
"""
