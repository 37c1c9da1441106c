import sys
from pathlib import Path

# bench/ is a folder of scripts, not a package: make its helpers importable
sys.path.insert(0, str(Path(__file__).parent))
