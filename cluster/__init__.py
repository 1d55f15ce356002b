"""What several swarmdesk processes share through Redis (queue.backend: redis): connections
and key names (redis.py) and the small shared primitives every layer may use — rate limits,
cool-downs, locks, remembered ids. A layer below `channels` and `orchestration` (like
config_section): it imports neither them nor `bot`. The pipeline's own distributed parts (the
work queue, the event bus) are in bot/distributed/."""
