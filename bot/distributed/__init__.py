"""The distributed mode (queue.backend: redis): what several swarmdesk processes share through
Redis — the work (queue.py), the live events (bus.py), and the state that must hold across
processes (tokens, limits, breakers, budgets). The embedded default keeps all of it in memory.
"""
