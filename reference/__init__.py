"""kvsink reference implementation (numpy): the specification of the algorithm.

Read docs/01-notation.md first; each module names the docs page it implements:

=======================  ==========================  ==============================================
module                   docs page                   definitions
=======================  ==========================  ==============================================
``config``               docs/07-config.md           ``KVSinkConfig``, the one shared configuration
``packing``              docs/02-quantization.md     bit packing of codes into uint32 words
``quantize``             docs/02-quantization.md     uniform asymmetric / symmetric group quantizers
``preserve``             docs/03-preservation.md     PFN, attention oracle, union, cap
``predictor``            docs/04-predictor.md        the KVSink sink predictor and its calibration
``attention``            docs/05-attention.md        preserved attention, direct and split forms
``cache``                docs/06-cache.md            the streaming quantized KV cache, all layers
                                                     (re-exports the API of the ``cache_*`` modules)
``cache_layer``          docs/06-cache.md            one layer: what every quantizer shares
``cache_state``          docs/06-cache.md            residual window, preserved store (records)
``cache_store``          docs/06-cache.md            quantized store: base class, uniform store
``cache_kvquant``        docs/06-cache.md            the KVQuant store
``cache_checks``         docs/06-cache.md            the cache's argument checks
``kvquant``              docs/08-kvquant.md          KVQuant-style quantizer: 8.10, and re-exports
                                                     the ``kvquant_*`` modules
``kvquant_rope``         docs/08-kvquant.md          8.1 rotary embedding
``kvquant_levels``       docs/08-kvquant.md          8.2 - 8.4 level grid, normalisation
``kvquant_tensor``       docs/08-kvquant.md          8.5 - 8.7 outliers, dense-and-sparse tensor
``kvquant_calibration``  docs/08-kvquant.md          8.8 - 8.9 k-means, calibration
=======================  ==========================  ==============================================

The package exports its modules (``reference.quantize.quantize``, …) and
``KVSinkConfig``; functions are not re-exported at the top, so that a module
and the function named after it (``quantize``) never shadow each other.
"""

from . import (attention, cache, cache_checks, cache_kvquant, cache_layer, cache_state, cache_store,
               config, kvquant, kvquant_calibration, kvquant_levels, kvquant_rope, kvquant_tensor,
               packing, predictor, preserve, quantize)
from .config import KVSinkConfig

__all__ = ["KVSinkConfig", "attention", "cache", "cache_checks", "cache_kvquant", "cache_layer",
           "cache_state", "cache_store", "config", "kvquant", "kvquant_calibration",
           "kvquant_levels", "kvquant_rope", "kvquant_tensor", "packing", "predictor", "preserve",
           "quantize"]
