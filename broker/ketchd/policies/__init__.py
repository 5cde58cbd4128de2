"""Model selection: which linked models get a query, how their answers become one reply, and
what feedback teaches.

Pure code (no sockets, no clock, no global random state: randomness comes from the
``numpy.random.Generator`` a policy holds, given to it or seeded from its ``seed`` option).
One policy object per app, owned by the broker loop; nothing here takes a lock.

Policies, chosen per app by name (``make_policy(name, **options)``):

``single``    the linked model named by ``model`` (else the first linked).
``weighted``  one model per query, drawn by configured weights (canary, A/B); with a context key
              the draw is a hash of the key, so a user stays on the same model.
``shadow``    the primary answers; every query is also sent to the shadow models, whose answers
              only feed agreement figures (``record_shadow``).
``exp3``      one model per query, drawn by Exp3 weights learned from feedback (a bandit).
``exp4``      (alias ``ensemble``) every linked model per query; the answers are combined with
              weights learned from feedback (exponential weights, "Hedge").

How the broker drives a policy (one query)
------------------------------------------
1. ``sel = policy.select(app.models, context)`` where ``app.models`` is the current list of
   linked models (never empty: an app without models is answered NO_MODEL before this) and
   ``context`` is the query's context key ("" for none). ``sel.send_to``: the models that get
   the query; ``sel.answer_from``: those whose answers may reach the caller (a shadow model is
   in ``send_to`` only); ``sel.wait_all``: when True (ensembles) the reply waits for all of
   ``answer_from`` or the app's deadline, whichever is first, and is made with the answers
   that arrived (stragglers never hold a reply); when False it goes at the first answer from
   ``answer_from`` (or at the deadline).
2. ``c = policy.combine(answers, sel.answer_from, context)`` where ``answers`` maps each model
   of ``answer_from`` that answered to its decoded output (a model that failed or missed the
   deadline is simply absent; answers from other models are ignored). ``c.output``,
   ``c.confidence``, ``c.answered``, ``c.missing`` and ``c.model`` fill the reply.
   ``policy.use_default(c)`` says whether to send the app's default instead: nothing
   answered, or a confidence under the app's ``min_confidence``.
   With one model in ``answer_from`` and ``wait_all`` False, ``combine`` returns that model's
   answer with confidence 1, so the broker may forward the payload frame undecoded and skip
   ``combine``; it must decode outputs only for ``wait_all`` selections (ensembles).
3. Shadow traffic: when the shadows have answered (or at the deadline, with those that did),
   ``policy.record_shadow(primary_answer, shadow_answers, missing)``; not called when the
   primary itself did not answer. ``record_shadow`` is a no-op for other policies.
4. Feedback (``Feedback{app, request_id, label}``): the broker keeps, for a bounded number of
   answered requests, ``(context, sel, answers)`` (answers decoded lazily is fine; answers that
   arrived after the reply may be included) and calls
   ``policy.feedback(answers, label, context, selection=sel)``. Every policy keeps per-model
   loss figures from feedback (an A/B test's result); ``exp3``/``exp4`` also learn
   (``policy.learns``). Without ``selection`` Exp3 uses the current probabilities instead of
   those the query was drawn with (slightly biased, still converges).
5. Persistence: ``policy.state()`` is a JSON-serialisable dict (options, learned weights of the
   app and of each context, figures); ``Policy.from_state(d, rng=...)`` rebuilds the policy.
   With 10,000 contexts of three models, ``state()`` takes about 2 ms and its JSON text is
   about 700 kB (10 ms to encode): take the snapshot on the loop, encode and write it off the
   loop, e.g. every N feedbacks and at shutdown. (``select`` and ``combine`` change state
   too, but only in ways a restart may lose: LRU order, the weight table following the
   linked models, figures.)
   ``policy.reconfigure(**options)`` (``app set-policy`` with the same policy) keeps what was
   learned; another policy name starts afresh from ``make_policy``.
6. ``policy.describe()`` gives options, weights and figures for ``ketch app show``.

Invalid names or options raise ``ValueError`` with a message a person can act on; so does
``select`` with no models.

Outputs, votes and means
------------------------
Answers are decoded Python values. Floating-point values (``float``, numpy floating scalars
and arrays, JSON lists of numbers that hold a float) are *numbers*; everything else (``str``,
``bytes``, ``bool``, ``int``, integer arrays, JSON objects and other lists, ``None``) is a
*label*, compared as a whole (``1`` equals ``1.0``, ``True`` does not equal ``1``, one-element
arrays compare as their item). When every answer is a number of one shape the output is the
weighted mean (same type as the heaviest answer: float, numpy scalar, array or list);
otherwise it is a weighted majority vote, the output being the winning label as answered by
the heaviest model that voted for it (a tie goes to the label whose voters come first in
``asked``).

``confidence = agreement * answered / asked`` (counts of models), in [0, 1], where agreement
is, for a vote, the weight share of the answered models that voted for the winner, and for
numbers ``1 - spread / rms``: spread is the weighted root-mean-square distance of the answers
from their mean, rms the weighted root-mean-square size of the answers (spread <= rms, so it
is in [0, 1]; 1 when all agree, 0 for answers x and -x; answers near zero look less agreeing
than the same differences far from zero).

Loss (feedback)
---------------
A number answered for a numeric label (int or float, same number of elements):
``loss = e2 / (e2 + s2)`` with ``e2`` the mean squared error and ``s2`` the square of the
``scale`` option, or by default the label's mean square (relative error; a label of exactly 0
gives loss 0 for an exact answer, else 1). An error the size of ``scale`` costs 0.5. Any
other answer: loss 0 when it equals the label (as above), else 1. Reward = 1 - loss.

Weights
-------
Learned weights live in log space, normalised after every update so the largest is 0, and
never more than ``MAX_LOG_RATIO`` below it (a weight ratio of e**20): sums cannot overflow,
and a model that gets better later is found again in bounded time (a light form of Exp3.S /
fixed share). The weight table follows the linked models: at ``select``/``combine`` a model
that is no longer linked is dropped and a newly linked model gets the mean (linear) weight of
the others.

Per-context state: with a context key and ``max_contexts > 0``, a learning policy keeps a
table per key, created as a copy of the app-wide table at the key's first feedback; a key
without a table selects with the app-wide one. Feedback updates the app-wide table and the
key's table, so new keys start from what all traffic taught. Tables are kept LRU, at most
``max_contexts`` of them (default 10,000); an evicted key starts again from the app-wide table.
``weighted`` needs no state per key: weighted rendezvous hashing of (salt, key, model) gives
each model a share equal to its weight, and moves as few keys as possible when a weight or the
model list changes (raising a canary's weight only moves users onto the canary).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ketchd.policies.base import DEFAULT_MAX_CONTEXTS, MAX_LOG_RATIO, STATE_VERSION, ModelFigures, Policy
from ketchd.policies.combine import (
    Combined,
    Selection,
    agreement,
    combine_answers,
    label_key,
    loss,
    needs_default,
)
from ketchd.policies.learned import Ensemble, Exp3, Exp4
from ketchd.policies.simple import Shadow, Single, Weighted

POLICIES: dict[str, type[Policy]] = {p.name: p for p in (Single, Weighted, Shadow, Exp3, Exp4, Ensemble)}


def make_policy(name: str, *, rng: np.random.Generator | None = None, **options: Any) -> Policy:
    """The policy called ``name`` with ``options``; ``rng`` replaces the one seeded from ``seed``."""
    cls = POLICIES.get(name)
    if cls is None:
        raise ValueError(f"unknown policy {name!r}: one of {', '.join(POLICIES)}")
    return cls(rng=rng, **options)


__all__ = [
    "DEFAULT_MAX_CONTEXTS",
    "MAX_LOG_RATIO",
    "POLICIES",
    "STATE_VERSION",
    "Combined",
    "Ensemble",
    "Exp3",
    "Exp4",
    "ModelFigures",
    "Policy",
    "Selection",
    "Shadow",
    "Single",
    "Weighted",
    "agreement",
    "combine_answers",
    "label_key",
    "loss",
    "make_policy",
    "needs_default",
]
