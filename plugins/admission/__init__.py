"""Built-in admission plugins: saturation detectors and flow-control policies (see ``epp.admission``)."""

from plugins.admission import policies, saturation  # noqa: F401
