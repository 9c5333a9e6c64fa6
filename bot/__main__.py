from bot.console.cli import main

raise SystemExit(main())
