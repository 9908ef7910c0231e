from tensord.cli import main

raise SystemExit(main())
