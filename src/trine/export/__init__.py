"""Exports of a trine model: sentence-transformers v6 folders (:func:`export_sentence_transformers`)
and one ONNX graph with every output (:func:`export_onnx`, run by :class:`OnnxM3Model`)."""

from trine._lazy import lazy_exports

# Public name -> the module that defines it, imported on first use (see trine._lazy).
_EXPORTS = {
    "OnnxM3Model": "trine.export.onnx",
    "export_onnx": "trine.export.onnx",
    "export_sentence_transformers": "trine.export.st",
}

__all__ = list(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
