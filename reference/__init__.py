"""kvsink reference implementation (numpy): the specification of the algorithm.

Read docs/01-notation.md first; each module names the docs page it implements:

==================  ==========================  ==============================================
module              docs page                   definitions
==================  ==========================  ==============================================
``config``          docs/07-config.md           ``KVSinkConfig``, the one shared configuration
``packing``         docs/02-quantization.md     bit packing of codes into uint32 words
``quantize``        docs/02-quantization.md     uniform asymmetric / symmetric group quantizers
``preserve``        docs/03-preservation.md     PFN, attention oracle, union, cap
``predictor``       docs/04-predictor.md        the KVSink sink predictor and its calibration
``attention``       docs/05-attention.md        preserved attention, direct and split forms
``cache``           docs/06-cache.md            the streaming quantized KV cache
``kvquant``         docs/08-kvquant.md          the KVQuant-style quantizer
==================  ==========================  ==============================================

The package exports its modules (``reference.quantize.quantize``, …) and
``KVSinkConfig``; functions are not re-exported at the top, so that a module
and the function named after it (``quantize``) never shadow each other.
"""

from . import attention, cache, config, kvquant, packing, predictor, preserve, quantize
from .config import KVSinkConfig

__all__ = ["KVSinkConfig", "attention", "cache", "config", "kvquant", "packing", "predictor",
           "preserve", "quantize"]
