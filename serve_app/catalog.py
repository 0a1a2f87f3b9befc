"""The served models: each one's name and aliases, where it runs, and which model scores a request's pairs.

One catalog for the ingress and the bulk job, built from the settings alone (no torch, no Ray): the defaults
(`text`, `image_text`) plus the named `models`, each in a pool of its own or in the shared multiplexed pool.
"""

from __future__ import annotations

from dataclasses import dataclass

from serve_app.errors import InvalidInput, ModelNotFound, PoolUnavailable
from serve_app.settings import MODALITIES, ModelSettings, PoolSettings, Settings, deployment_key, env_name

SHARED = "shared"  # the key of the shared pool; own pools' keys are "text", "image_text", "model_<name>"


def modality_of(query_has_image: bool, document_has_image: bool) -> str:
    """The one rule for a pair's modality (the ingress, the bulk job, calibrate_scores): an image on either side
    makes it image_text."""
    return "image_text" if query_has_image or document_has_image else "text"


def modality_counts(modalities: list[str]) -> dict[str, int]:
    """Pairs per modality, every modality named (what `Catalog.route` takes)."""
    return {modality: modalities.count(modality) for modality in MODALITIES}


@dataclass(frozen=True)
class Served:
    """One served model. `modality` picks its batch profile rows, warm-up and probe pairs, and whether it
    takes image pairs; `key` is the pool (deployment) its pairs go to."""

    name: str
    aliases: tuple[str, ...]
    modality: str  # "text" | "image_text"
    placement: str  # "own" | "shared"
    key: str
    settings: PoolSettings
    default: bool

    @property
    def takes_images(self) -> bool:
        return self.modality == "image_text"

    def set_where(self, field: str) -> str:
        """Where an operator sets this model's `field`: the env variable of a default, else its list entry."""
        return env_name(self.key, field) if self.default else f"models[name={self.name}].{field}"


def served_models(settings: Settings) -> list[Served]:
    """Every enabled model: the two defaults first, then the named ones in settings order."""
    served = []
    for pool in MODALITIES:
        model = settings.default_model(pool)
        if model.enabled:
            served.append(Served(model.served_name(), tuple(model.aliases), pool, "own", pool, model, True))
    for model in settings.models:
        if model.enabled:
            key = SHARED if model.placement == "shared" else deployment_key(model.name)
            served.append(Served(model.name, tuple(model.aliases), model.modality, model.placement, key, model, False))
    return served


class Catalog:
    """Names -> served models, and the routing of a request's pairs."""

    def __init__(self, settings: Settings) -> None:
        self.models = served_models(settings)
        self.by_name = {name: m for m in self.models for name in (m.name, *m.aliases)}
        self.defaults = {m.modality: m for m in self.models if m.default}

    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def shared(self) -> dict[str, ModelSettings]:
        return {m.name: m.settings for m in self.models if m.placement == "shared"}

    def find(self, name: str) -> Served:
        served = self.by_name.get(name)
        if served is None:
            aliases = {alias: m.name for m in self.models for alias in m.aliases}
            raise ModelNotFound(
                f"model {name!r} not found; this service serves {self.names()}"
                + (f" (aliases: {aliases})" if aliases else "")
                + ": send one of these names as `model`, or leave `model` out for the defaults",
                self.names(),
            )
        return served

    def route(self, name: str | None, pairs: dict[str, int]) -> dict[str, Served]:
        """The model for each kind of pair the request has ("text", "image_text" -> how many): the named model
        for all of them, or the default of each kind when `model` is unset."""
        if name is not None:
            served = self.find(name)
            if pairs.get("image_text") and not served.takes_images:
                takes = [m.name for m in self.models if m.takes_images]
                raise InvalidInput(
                    f"model {served.name!r} scores text pairs only, and this request has {pairs['image_text']} "
                    f"pair(s) with an image; models that take images: {takes or 'none are served'}",
                    "model",
                )
            return {kind: served for kind, count in pairs.items() if count}
        routes = {}
        for kind, count in pairs.items():
            if not count:
                continue
            if kind not in self.defaults:
                raise PoolUnavailable(
                    f"this request has {count} {kind.replace('_', '-')} pair(s) but the {kind} pool is disabled; "
                    f"enable it ({env_name(kind, 'enabled')}=true) with a model ({env_name(kind, 'model')})"
                    + (f", or name a model that takes them in `model` ({self.names()})" if self.models else ""),
                    "documents",
                )
            routes[kind] = self.defaults[kind]
        return routes
