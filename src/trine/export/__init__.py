"""Exports of a trine model: sentence-transformers v6 folders (:func:`export_sentence_transformers`)
and one ONNX graph with every output (:func:`export_onnx`, run by :class:`OnnxM3Model`)."""

from trine.export.onnx import OnnxM3Model, export_onnx
from trine.export.st import export_sentence_transformers

__all__ = ["OnnxM3Model", "export_onnx", "export_sentence_transformers"]
