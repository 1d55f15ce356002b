"""Human agents: sign-in (auth.py), the agent API (api.py) the console and a shop's own tools
use, live events (events.py), and the `swarmdesk agents` command (cli.py). The console's
pages are static files (assets.py, static/)."""
