#!/usr/bin/env python3
"""Checks that two builds of the hand-written kernels hold the same kernels.

For refactors that must not change a kernel (moving kernels between .cu
files, helpers into headers): compile the old and the new sources to PTX with
the same flags, then

  python3 deploy/gpu/ptx_same.py OLD.ptx [OLD2.ptx ...] -- NEW.ptx [NEW2.ptx ...]

compares every `.entry` (kernel) by name and body, and the module-level
.shared/.global/.const declarations. Normalised first, as they depend on the
file a kernel lives in, not on its code: anonymous-namespace and internal
name parts (`NN_GLOBAL__N__<hash>_NN_<file>_cu_<hash>`), the block-reduction
helpers' static shared arrays, branch labels and local depots (numbered per
file). Exit status 0 when every kernel is the same, 1 otherwise (the first
differences are printed). nvcc runs on this development machine, e.g.

  nvcc -std=c++17 -O3 -arch=compute_90 -I. -ptx core/model/X.cu -o /tmp/X.ptx

(forty-seventh session: fused_kernels.cu against its four successors, 233
kernels the same).
"""
import difflib
import re
import sys

_ANON = re.compile(r'\d+_GLOBAL__N__[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]+')
_INTERNAL = re.compile(r'\d+_INTERNAL_[0-9a-f]+_\d+_\w+?_cu_[0-9a-f]+')
_SHARED = re.compile(
    r'_ZZN[0-9A-Za-z_]*?(BlockSumOnce|BlockSum|BlockMax)EfE\d+(warp_sums|warp_max)')


def normalised(text):
    text = _SHARED.sub(r'SHARED_\1_\2', text)
    text = _INTERNAL.sub('INTERNAL', text)
    text = _ANON.sub('ANON', text)
    text = re.sub(r'\$L__BB\d+_', '$L__BB_', text)
    return re.sub(r'__local_depot\d+', '__local_depot', text)


def read(paths):
    """{kernel name: body}, module-level declarations."""
    kernels, decls = {}, set()
    for path in paths:
        with open(path) as f:
            parts = re.split(r'\n(?=\.(?:visible \.)?entry )', normalised(f.read()))
        decls |= {l for l in parts[0].split('\n')
                  if l.startswith(('.shared', '.global', '.const'))}
        for part in parts[1:]:
            name = re.match(r'\.(?:visible \.)?entry (\S+?)\(', part).group(1)
            if name in kernels:
                sys.exit('%s: kernel %s defined twice' % (path, name))
            body = part.rstrip()
            kernels[name] = body[:body.rfind('\n}') + 2]
    return kernels, decls


def main(argv):
    if '--' not in argv:
        sys.exit(__doc__)
    cut = argv.index('--')
    old, old_decls = read(argv[:cut])
    new, new_decls = read(argv[cut + 1:])
    ok = True
    for name in sorted(set(old) ^ set(new)):
        print('only in %s: %s' % ('old' if name in old else 'new', name))
        ok = False
    differing = [n for n in sorted(set(old) & set(new)) if old[n] != new[n]]
    for name in differing[:3]:
        print('differs: %s' % name)
        diff = difflib.unified_diff(old[name].split('\n'), new[name].split('\n'),
                                    lineterm='', n=0)
        print('\n'.join(list(diff)[:20]))
    if old_decls != new_decls:
        print('module declarations differ:', sorted(old_decls ^ new_decls)[:6])
        ok = False
    print('%d kernels old, %d new, %d differing' % (len(old), len(new), len(differing)))
    return 0 if ok and not differing else 1


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
