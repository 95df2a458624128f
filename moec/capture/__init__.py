"""Capture: recognise MoE layers in a model and route dynamo through canonical ``moec::`` ops."""

from moec.capture.convert import CaptureResult, convert_model  # noqa: F401
from moec.capture.hook import install
from moec.capture.trace import capture_graphs  # noqa: F401

install()
