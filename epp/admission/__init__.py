"""Admission: whether a request is routed now, held, or refused -- saturation, priority, flow control.

* ``interfaces``: the plugin roles (saturation detector, fairness / ordering / usage-limit policies); the
  built-in plugins are in ``plugins/admission``.
* ``config``: the ``flowControl`` and ``saturationDetector`` sections of the ``EndpointPickerConfig``.
* ``queue``: priority bands, flows, ordered queues.
* ``controller``: ``Admission``, called by the director before each pick; legacy admission or flow control.
* ``metrics``: ``inference_extension_flow_control_*``.
* ``wake``: wake-on-request for model servers in vLLM's sleep mode.
"""
