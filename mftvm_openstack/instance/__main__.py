"""``python -m mftvm_openstack.instance ROLE GUEST_DIR``: run one side."""

import sys

from mftvm_openstack.instance.main import main

if __name__ == '__main__':
    sys.exit(main())
