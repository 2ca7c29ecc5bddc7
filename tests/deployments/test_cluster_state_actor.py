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


def live(weight: int, adapters: tuple[str, ...] = ("a",)) -> dict:
    return {"traffic": {"prod": {"targets": [{"target": "m", "weight": weight}]}},
            "adapters": {"m": {name: f"sim://{name}" for name in adapters}}}


async def test_two_changes_made_at_once_on_two_routers_do_not_undo_each_other():
    actor = ClusterStateActor()
    first, second = router(actor), router(actor)
    for sync in (first, second):
        sync.args_digest = "args-1"
        await sync.offer_live("", live(1))
    # Both change the settings they last saw; the second is refused, syncs, and makes its change again.
    assert await first.put_live(live(1, ("a", "b")), first.live_version)
    assert not await second.put_live(live(5), second.live_version)
    await second.sync_once()
    assert second.live_version == first.live_version
    assert await second.put_live(live(5, ("a", "b")), second.live_version)
    assert actor.adapters_of("m", 0, "args-1") == (actor._live_version, {"a": "sim://a", "b": "sim://b"})


async def test_a_replica_started_later_keeps_handle_changes_and_new_args_start_afresh():
    actor = ClusterStateActor()
    first = router(actor)
    first.args_digest = "args-1"
    await first.offer_live("config-1", live(1))
    assert await first.put_live(live(7), first.live_version)  # a rollout step from a handle
    later = router(actor)
    later.args_digest = "args-1"
    assert await later.offer_live("config-1", live(1)) == live(7)  # the same user_config: the change stays
    assert await later.offer_live("config-2", live(3)) == live(3)  # an edited user_config wins
    # A redeploy with other args restarted everything: the settings of the old args are not handed out.
    assert actor.adapters_of("m", 0, "args-2")[1] is None
    redeployed = router(actor)
    redeployed.args_digest = "args-2"
    assert await redeployed.offer_live("config-2", live(1, ("z",))) == live(1, ("z",))
    assert actor.adapters_of("m", 0, "args-2")[1] == {"z": "sim://z"}


async def test_a_restarted_actor_gets_the_settings_back_with_their_user_config():
    actor = ClusterStateActor()
    sync = router(actor)
    sync.args_digest = "args-1"
    sync._on_live = lambda _: None
    await sync.offer_live("config-1", live(1))
    assert await sync.put_live(live(9), sync.live_version)
    await sync.sync_once()
    restarted = ClusterStateActor()  # empty, with a new epoch
    sync._link._actor = InProcessActor(restarted)
    await sync.sync_once()
    await sync._restore
    assert restarted._live == live(9)
    later = router(restarted)
    later.args_digest = "args-1"
    assert await later.offer_live("config-1", live(1)) == live(9)  # not undone by the same user_config
