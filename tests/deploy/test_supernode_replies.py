"""``runtime.supernode.push_every_reply``: after a SuperLink restart, a reply the SuperNode loop of
Flower 1.42.0 would leave in its state (so the ServerApp waits out its round timeout) is pushed.

The scene, as a fresh-clone CI run logged it: the restarted SuperLink delivers a message of the
run that has ended; the SuperNode stores it and creates its task before the refusal, so a
ClientApp answers it. The resumed run's message comes next, the loop pushes the replies ready at
that moment (the ended run's), and the resumed run's reply, ready a moment later, waited for a pull
of a message that never came."""

import time

import flwr
import pytest

from runtime import supernode

if flwr.__version__ != supernode.PATCHED_FLWR:
    pytest.skip(f"the loop's patch applies to flwr {supernode.PATCHED_FLWR} only", allow_module_level=True)

from flwr.app import MetricRecord, RecordDict  # noqa: E402
from flwr.app.message.message import make_message  # noqa: E402
from flwr.app.metadata import Metadata  # noqa: E402
from flwr.supercore.object_store import ObjectStoreFactory  # noqa: E402
from flwr.supernode import start_client_internal as loop  # noqa: E402
from flwr.supernode.nodestate.in_memory_nodestate import InMemoryNodeState  # noqa: E402


def _message(run_id: int, reply_to: str = "", value: float = 0.0):
    metadata = Metadata(run_id=run_id, message_id="", src_node_id=1, dst_node_id=2, reply_to_message_id=reply_to,
                        group_id="1", created_at=time.time(), ttl=600.0, message_type="train")
    return make_message(metadata, RecordDict({"metrics": MetricRecord({"x": value})}))


def _state():
    store = ObjectStoreFactory().store()
    return InMemoryNodeState(store), store


def _store(message, state, store) -> str:
    loop._insert_message(message, state, store)
    return message.metadata.message_id


def test_an_empty_pull_leads_to_a_push_only_when_a_reply_waits():
    state, store = _state()
    pull = supernode.push_every_reply(lambda **kwargs: None)
    assert pull(state=state) is None  # nothing stored
    train = _store(_message(7), state, store)
    assert pull(state=state) is None  # an instruction waits for its ClientApp, no reply yet
    _store(_message(7, reply_to=train, value=1.0), state, store)
    assert pull(state=state) is not None  # the reply waits: the loop goes on to push it
    assert not any(entry.is_retrieved for entry in state.msg_store.values())  # a peek, nothing taken


def test_a_pulled_message_is_returned_as_flowers_pull_returns_it():
    state, _ = _state()
    assert supernode.push_every_reply(lambda **kwargs: 42)(state=state) == 42


def test_the_resumed_runs_reply_reaches_the_superlink_after_an_ended_runs_reply():
    state, store = _state()
    sent = []

    def send(message, object_tree, runtime):
        sent.append(message.metadata.run_id)
        return set(), "session"

    def push():
        loop._push_messages(state=state, object_store=store, send=send, push_object=lambda *args: None)

    ended = _store(_message(1), state, store)  # redelivered by the restarted SuperLink, refused
    _store(_message(1, reply_to=ended), state, store)  # ... but answered by a ClientApp
    resumed = _store(_message(2), state, store)  # the resumed run's train message: pulled
    push()  # Flower pushes what is ready now: the ended run's reply
    assert sent == [1]
    _store(_message(2, reply_to=resumed, value=2.0), state, store)  # the resumed run's reply comes
    pull = supernode.push_every_reply(lambda **kwargs: None)  # the SuperLink has nothing more for this site
    assert pull(state=state) is not None, "the reply would wait for a message that never comes"
    push()
    assert sent == [1, 2]


def test_the_supernode_loop_pulls_through_the_wrapper_once(monkeypatch, flower_pull_defaults):
    monkeypatch.setattr(loop, "time", time)
    monkeypatch.setattr(loop, "_pull_and_store_message", loop._pull_and_store_message)  # restored after the test
    original = getattr(loop._pull_and_store_message, "wrapped", loop._pull_and_store_message)
    monkeypatch.setattr(loop, "_pull_and_store_message", original)
    assert supernode.shorten_waits(0.05)
    assert supernode.shorten_waits(0.05)  # a second call does not wrap twice
    assert loop._pull_and_store_message.wrapped is original
