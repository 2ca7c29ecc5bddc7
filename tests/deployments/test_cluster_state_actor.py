"""The state actor and the routers' sync with it, called in-process (the actor's methods are plain
Python; Ray only hosts them)."""

import inspect
from types import SimpleNamespace
from typing import Any

from app.config import ClusterStateConfig
from app.deployments.state_actor import ClusterStateActor
from app.deployments.state_sync import RouterStateSync
from app.router.state import ClusterState, ReplicaInfo

PROMPT_BLOCKS = [11, 12, 13, 14]


class InProcessActor:
    """`actor.method.remote(...)` awaitable, as through a Ray handle."""

    def __init__(self, actor: ClusterStateActor) -> None:
        self._actor = actor

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._actor, name)

        async def remote(*args: Any) -> Any:
            result = method(*args)
            return await result if inspect.isawaitable(result) else result

        return SimpleNamespace(remote=remote)


def router(actor: ClusterStateActor) -> RouterStateSync:
    sync = RouterStateSync("app", ClusterState(), ClusterStateConfig())
    sync._link._actor = InProcessActor(actor)
    return sync


def info(replica_id: str, kv_events: bool) -> ReplicaInfo:
    return ReplicaInfo(replica_id=replica_id, model="m", block_size=16, num_gpu_blocks=1000, kv_events=kv_events)


async def test_a_router_that_joins_later_knows_where_earlier_requests_went_on_servers_without_events():
    actor = ClusterStateActor()
    actor.register(info("quiet", kv_events=False), [])
    actor.register(info("publishing", kv_events=True), [])
    first, follower = router(actor), router(actor)
    for sync in (first, follower):
        await sync.sync_once()

    # The first router sent the same prompt to both servers. For the quiet one its guess is all
    # anyone will ever know; the publishing one will confirm its blocks by events.
    first.speculated("quiet", PROMPT_BLOCKS)
    first.speculated("publishing", PROMPT_BLOCKS)
    await first.sync_once()

    # A router that follows the log hears both guesses.
    await follower.sync_once()
    state = follower.state
    assert state.index.match(PROMPT_BLOCKS, state.speculative.rows(PROMPT_BLOCKS)) == {"quiet": 4, "publishing": 4}

    # One that starts later (scaled up, restarted) takes a snapshot: the quiet server's guess is in it.
    later = router(actor)
    await later.sync_once()
    assert later.state.index.match(PROMPT_BLOCKS) == {"quiet": 4}
