import gc

# Starting is mostly imports (the mode's modules are imported in `main`): many allocations and
# hardly a cycle among them, which the cyclic GC would walk again and again. It is off until
# the mode's modules are in (`bot.console.cli.imports_done`) and on again before it runs.
gc.disable()

from bot.console.cli import main  # noqa: E402

raise SystemExit(main())
