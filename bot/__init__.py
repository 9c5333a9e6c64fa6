"""dbops-bot machinery: settings, Slack, router, gateway, state, rendering, command line."""
