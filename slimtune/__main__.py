from slimtune.cli import main

raise SystemExit(main())
