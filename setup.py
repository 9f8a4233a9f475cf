import setuptools

# The hash tracker's per-page loop (mftvm_openstack/ft/_pagehash.c), on
# Debian's libxxhash (apt: libxxhash-dev; tools/run.sh installs it).
PAGEHASH = setuptools.Extension(
    'mftvm_openstack.ft._pagehash',
    sources=['mftvm_openstack/ft/_pagehash.c'],
    libraries=['xxhash'],
    extra_compile_args=['-O2'])

setuptools.setup(setup_requires=['pbr>=6.0'], pbr=True,
                 ext_modules=[PAGEHASH])
