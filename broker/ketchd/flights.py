"""The prediction cache in front of the queues, and single-flight for identical queries.

A query of a cacheable model is answered from the cache when its input is there; when an
identical query is already queued or computing (its *leader*), it waits as a follower and
gets the leader's answer (or its error when the model failed on that input). A leader that
ends without a prediction hands its followers to the first of them, which is queued in its
place.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import zmq
from ketch import protocol as proto
from ketch.protocol import ErrorCode, Status

from ketchd.cache import PredictionCache
from ketchd.registry import Model, Pending

if TYPE_CHECKING:
    from ketchd.broker import Broker


class Flights:
    def __init__(self, broker: Broker, cache: PredictionCache) -> None:
        self.broker = broker
        self.cache = cache
        self.flights: dict[Any, list[Pending]] = {}  # cache key -> leaders computing it

    def from_cache_or_flight(self, p: Pending, model: Model, *, lead: bool = True) -> bool:
        """Answer ``p`` from the cache, or make it wait on an identical query in flight.

        Returns False when ``p`` must be computed; it is then the leader of its flight
        (with ``lead`` false, when it will not be computed, it is left out of the flights).
        """
        b = self.broker
        data = p.payload.buffer if isinstance(p.payload, zmq.Frame) else p.payload
        assert model.active_version is not None  # a model is cached only with an active version
        version = model.active_version
        fingerprint = model.fingerprints.get(version)  # the key's version: cache.version_key, inline
        try:
            key = self.cache.key(
                model.name, f"{version}\x00{fingerprint}" if fingerprint else version, p.dtype, p.shape, data
            )
            entry = self.cache.get(key, data)
        except Exception as exc:  # a bug of the cache: this query is computed, the loop goes on
            b.faults.internal_error("the prediction cache looking up a query", exc)
            return False
        if entry is not None:
            model.cache_hits += 1
            p.app.cache_hits += 1
            ms = b.answers.finish(p, p.app.durations.get(model.name, version))
            item = proto.ReplyFields(
                p.request_id,
                Status.OK,
                entry.dtype,
                entry.shape,
                model=model.name,
                model_version=version,
                latency_us=int(ms * 1000),
                models_answered=(model.name,),
            )
            b.answers.deliver(p, item, entry.output)
            return True
        leaders = self.flights.setdefault(key, [])
        for leader in leaders:
            if (leader.payload.buffer if isinstance(leader.payload, zmq.Frame) else leader.payload) == data:
                assert leader.followers is not None  # a leader has its list of followers
                leader.followers.append(p)
                model.coalesced += 1
                self.cache.figures.coalesced += 1
                b.deadlines.add(p.deadline, p)
                return True
        if not lead:
            if not leaders:
                del self.flights[key]
            return False
        p.cache_key, p.followers = key, []
        leaders.append(p)
        return False

    def release(self, p: Pending) -> list[Pending]:
        """End ``p``'s flight; returns its followers still waiting."""
        leaders = self.flights.get(p.cache_key)
        if leaders is not None:
            if p in leaders:
                leaders.remove(p)
            if not leaders:
                del self.flights[p.cache_key]
        followers = [f for f in p.followers or () if not f.done]
        p.cache_key, p.followers = None, None
        return followers

    def promote(self, followers: list[Pending], key: Any) -> None:
        """The leader got no prediction: the first follower computes for the rest."""
        if not followers:
            return
        b = self.broker
        lead, rest = followers[0], followers[1:]
        model = b.models.get(lead.model)
        if model is None:
            for f in followers:
                b.answers.answer_error(f, ErrorCode.NO_MODEL, f"model {lead.model!r} is gone")
            return
        lead.cache_key, lead.followers = key, rest
        self.flights.setdefault(key, []).append(lead)
        model = model.lane(lead.version)
        model.queue.push(lead)
        b.dispatcher.mark_dirty(model)
