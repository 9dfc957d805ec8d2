"""``python -m device_sim`` is ``iotauth-device``."""

from device_sim.cli import main

main()
