"""dbops-bot: the machinery around `commands/` (which holds every diagnostic and remedy).

Floors, lowest first; a module imports only from its own floor or lower ones
(tests/test_floors.py holds the list):
- plain modules here: `settings`, `clock`, `metrics`, `tasks`, `embedded_pg`, `gateway`,
  `router`;
- `bot.state`: the bot's own state store (SQLAlchemy, Alembic);
- `bot.messages`: Block Kit rendering, notifiers, signed button values;
- `bot.access`: who may do what (roles);
- `bot.approvals`: the approval rules, the executor, the acting identity;
- `bot.incidents`: incidents, their messages, templates, summary, watchdog and leader;
- `bot.house`: the composition root that builds every service once;
- `bot.slack`: the Bolt app, HTTP and Socket Mode serving, exports, worker processes;
- `bot.console`: the command line, the console frontend and the demo.
"""
