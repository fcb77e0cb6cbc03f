import sys

if sys.argv[1:2] == ["init"]:
    # PID 1: straight to pvpy.device.pid1, without the CLI's imports (argparse, typing).
    from pvpy.device.pid1 import main as init_main

    init_main(sys.argv[2:])

from pvpy.cli import main

sys.exit(main())
