"""What a pinned model version names: one rule for the broker, the gateway and the clients.

A query may pin the model version that answers it (``Query.model_version``; the Python
client's ``version=``; ``/v2/models/{app}/versions/{v}``; Clipper's ``"version"`` key).
Versions belong to models and a query names an app, so:

- an app that links one model: ``VERSION`` is that model's version (``MODEL:VERSION``
  names it too);
- an app that links several models (an ensemble, a bandit): ``MODEL:VERSION`` names one of
  them, and the query goes to that model's version alone, past the app's selection (no fan
  out, nothing learnt from it); a plain ``VERSION`` is refused (``Invalid``), as Clipper
  refuses a version for an app of several models.

Model names hold no ``':'``, so the split is unambiguous.
"""

from __future__ import annotations

from collections.abc import Sequence

from ketch import errors


def split_pin(app: str, models: Sequence[str], model_version: str) -> tuple[str, str]:
    """(model, version) that ``model_version`` pins for ``app``, which links ``models``.

    Raises NotFound (``MODEL:`` names a model the app does not link, or it links none) or
    Invalid (a plain version for an app of several models)."""
    name, sep, version = model_version.partition(":")
    if sep and name in models:
        return name, version
    if len(models) == 1:
        return models[0], model_version
    if not models:
        raise errors.NotFound(f"app {app!r} links no model, so it has no version {model_version!r}")
    if sep:
        raise errors.NotFound(f"app {app!r} links no model {name!r} (it links {', '.join(models)})")
    raise errors.Invalid(
        f"app {app!r} links {len(models)} models ({', '.join(models)}): pin one of them as"
        f" MODEL:VERSION, e.g. {models[0]}:{model_version}"
    )


def pin_text(models: Sequence[str], model: str, version: str) -> str:
    """How a version of ``model`` is named for an app linking ``models`` (``split_pin``'s inverse)."""
    return version if len(models) == 1 else f"{model}:{version}"


def no_version(model: str, version: str, known: Sequence[str]) -> errors.NotFound:
    return errors.NotFound(
        f"model {model!r} has no version {version!r} (versions: {', '.join(known) or 'none'})"
    )
