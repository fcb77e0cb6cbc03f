import sys

if sys.argv[1:2] == ["init"]:
    # PID 1: straight to pvpy.init, without the CLI's imports (argparse, typing).
    from pvpy.init import main as init_main

    init_main(sys.argv[2:])

from pvpy.cli import main

sys.exit(main())
