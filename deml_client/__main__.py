from deml_client.cli import main

raise SystemExit(main())
