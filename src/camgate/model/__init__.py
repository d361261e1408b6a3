"""Models: the model card (:mod:`.card`), loading it into a module or a black-box backend
(:mod:`.load`, :mod:`.backends`) and finding and checking its target layers (:mod:`.layers`)."""
from ..errors import ModelCardError
from .card import ModelCard
from .layers import default_target_layers, resolve_layers, token_reshape
from .load import LoadedModel, card_json, load_model, pick_device, resolved_card

__all__ = ["LoadedModel", "ModelCard", "ModelCardError", "card_json", "default_target_layers", "load_model",
           "pick_device", "resolve_layers", "resolved_card", "token_reshape"]
