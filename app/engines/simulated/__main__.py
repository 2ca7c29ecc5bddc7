from app.engines.simulated.server import main

main()
