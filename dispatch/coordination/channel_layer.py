"""The Redis channel layer hal0web runs on (``CHANNEL_LAYERS`` in hal0web/settings.py).

channels-redis's own, with one change: its connections come from a bounded pool that makes a
burst wait for a free connection (up to the pool's ``timeout``), where redis-py's default
pool raises "Too many connections" past its 100 (issue 24: 298 of 500 pages connecting at
once got a 500 that way, when every page joined its groups itself). Pages no longer touch
the layer (dispatch.coordination.events: one channel per process hears their groups), so a
process needs a few connections: one blocking read, the batches, the processes' messages.
"""

from __future__ import annotations

from typing import Any

from channels_redis.core import (  # type: ignore[import-untyped]
    RedisChannelLayer as ChannelsRedisLayer,
)
from redis import asyncio as aioredis


class RedisChannelLayer(ChannelsRedisLayer):
    def create_pool(self, index: int) -> Any:
        host = dict(self.hosts[index])
        return aioredis.BlockingConnectionPool.from_url(host.pop("address"), **host)
