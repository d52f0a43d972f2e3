"""Built-in admission plugins: saturation detectors and flow-control policies (see ``epp.admission``)."""

from epp_plugins.admission import policies, saturation  # noqa: F401
