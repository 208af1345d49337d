# Emulates core/model/mma_attention.cuh MmaAttentionKernel's per-lane index math in fp64
# (no TF32 rounding) with the PTX mma.m16n8k8 fragment layouts (a: rows g, g + 8 and columns t,
# t + 4; b: rows t, t + 4, column g; c: row g (+ 8), columns 2t, 2t + 1), against
# softmax(q k^T + bias) v, for one (row, head) of several query and key lengths. Runs on this
# machine (Debian's python3-numpy: /usr/bin/python3 deploy/gpu/mma_attention_emulation.py).
# Prints each shape's largest difference (fp64 rounding: about 1e-15). Then the arithmetic's
# accuracy: the 3xTF32 split (truncating, as mma_tf32.cuh Tf32Split) with fp32 sums per 8-wide
# MMA step, against fp64, relative to max(1, max |want|) as the attention suite measures it
# (its tolerance: 1e-5), at the suite's scales (q, k, v ~ 0.5 N(0, 1), bias ~ 2 N(0, 1)).
import numpy as np
LD=68
def mma(c, a, b0, b1):
    # c[lane][4], a[lane][4], b0[lane], b1[lane]: gather to matrices per PTX layout
    A=np.zeros((16,8)); B=np.zeros((8,8)); C=np.zeros((16,8))
    for lane in range(32):
        g,t=lane>>2,lane&3
        A[g][t]=a[lane][0]; A[g+8][t]=a[lane][1]; A[g][t+4]=a[lane][2]; A[g+8][t+4]=a[lane][3]
        B[t][g]=b0[lane]; B[t+4][g]=b1[lane]
        C[g][2*t]=c[lane][0]; C[g][2*t+1]=c[lane][1]; C[g+8][2*t]=c[lane][2]; C[g+8][2*t+1]=c[lane][3]
    D=C+A@B
    for lane in range(32):
        g,t=lane>>2,lane&3
        c[lane][:]=[D[g][2*t],D[g][2*t+1],D[g+8][2*t],D[g+8][2*t+1]]

def kernel(q,k,v,bias,T,S,groups_t):
    warps=min(8,(T+15)//16); SP=8*groups_t
    out=np.full((T,64),np.nan)
    for tile in range((T+16*warps-1)//(16*warps)):
        t_begin=tile*warps*16
        if t_begin>=T: continue
        t_last=min(T,t_begin+warps*16)-1
        ks=np.zeros((SP,LD)); vs=np.zeros((SP,LD))
        for j in range(SP):
            if j<S: ks[j,:64]=k[j]; vs[j,:64]=v[j]
        for w in range(warps):
            w_t0=t_begin+w*16
            if w_t0>t_last: continue
            groups=min(groups_t,(S+7)//8)
            s=np.zeros((32,groups_t,4))
            for lane in range(32):
                g,t4=lane>>2,lane&3
                tq0=min(w_t0+g,t_last); tq1=min(w_t0+g+8,t_last)
                for c in range(groups_t):
                    for e in (0,2):  # a pair (keys j, j + 1) where both are in, else one by one
                        j=8*c+2*t4; tt=tq0 if e<2 else tq1
                        if c<groups and j+1<S:
                            s[lane][c][e],s[lane][c][e+1]=bias[tt][j],bias[tt][j+1]
                        else:
                            s[lane][c][e]=bias[tt][j] if (c<groups and j<S) else 0
                            s[lane][c][e+1]=bias[tt][j+1] if (c<groups and j+1<S) else 0
            # the queries' fragments from global rows tq0 = min(w_t0 + g, t_last), tq1 (g + 8)
            rows=[(min(w_t0+(lane>>2),t_last),min(w_t0+(lane>>2)+8,t_last)) for lane in range(32)]
            for d in range(0,64,8):
                a=[[q[rows[lane][0]][d+(lane&3)],q[rows[lane][1]][d+(lane&3)],q[rows[lane][0]][d+(lane&3)+4],q[rows[lane][1]][d+(lane&3)+4]] for lane in range(32)]
                for c in range(groups):
                    b0=[ks[(8*c+(lane>>2)),d+(lane&3)] for lane in range(32)]
                    b1=[ks[(8*c+(lane>>2)),d+(lane&3)+4] for lane in range(32)]
                    cc=[list(s[lane][c]) for lane in range(32)]
                    mma(cc,a,b0,b1)
                    for lane in range(32): s[lane][c]=cc[lane]
            m=np.full((32,2),-np.inf)
            for lane in range(32):
                t4=lane&3
                for c in range(groups_t):
                    for e in range(4):
                        if c<groups and 8*c+2*t4+(e&1)<S: m[lane][e>>1]=max(m[lane][e>>1],s[lane][c][e])
            mq=np.array([np.max(m[(l&~3):(l&~3)+4],axis=0) for l in range(32)])
            ssum=np.zeros((32,2))
            for lane in range(32):
                t4=lane&3
                for c in range(groups_t):
                    for e in range(4):
                        inn=c<groups and 8*c+2*t4+(e&1)<S
                        p=np.exp(s[lane][c][e]-mq[lane][e>>1]) if inn else 0
                        s[lane][c][e]=p; ssum[lane][e>>1]+=p
            sq=np.array([np.sum(ssum[(l&~3):(l&~3)+4],axis=0) for l in range(32)])
            o=np.zeros((32,8,4))
            for c in range(groups):
                pa=[[s[lane][c][0],s[lane][c][2],s[lane][c][1],s[lane][c][3]] for lane in range(32)]
                for n in range(8):
                    b0=[vs[8*c+2*(lane&3), (lane>>2)+8*n] for lane in range(32)]
                    b1=[vs[8*c+2*(lane&3)+1, (lane>>2)+8*n] for lane in range(32)]
                    cc=[list(o[lane][n]) for lane in range(32)]
                    mma(cc,pa,b0,b1)
                    for lane in range(32): o[lane][n]=cc[lane]
            for lane in range(32):
                g,t4=lane>>2,lane&3
                for i in range(2):
                    t=w_t0+g+8*i
                    if t>t_last: break
                    for n in range(8):  # one pair store
                        out[t][8*n+2*t4:8*n+2*t4+2]=[o[lane][n][2*i]/sq[lane][i],o[lane][n][2*i+1]/sq[lane][i]]
    return out

rng=np.random.default_rng(0)
for T,S in [(72,72),(33,33),(45,45),(128,128),(40,37),(150,100)]:
    q=rng.standard_normal((T,64))*0.5; k=rng.standard_normal((S,64))*0.5; v=rng.standard_normal((S,64))
    bias=rng.standard_normal((T,S))*2
    sc=q@k.T+bias; p=np.exp(sc-sc.max(1,keepdims=True)); p/=p.sum(1,keepdims=True); ref=p@v
    got=kernel(q,k,v,bias,T,S,(S+7)//8)
    print(T,S,np.abs(got-ref).max())

# The arithmetic.
def split(x):
    x=x.astype(np.float32)
    big=(x.view(np.uint32)&np.uint32(0xffffe000)).view(np.float32)
    small=((x-big).view(np.uint32)&np.uint32(0xffffe000)).view(np.float32)
    return big,small
def mm3(a,b,split_a=True,split_b=True):
    ab,as_=split(a) if split_a else (a.astype(np.float32),np.zeros_like(a,dtype=np.float32))
    bb,bs=split(b) if split_b else (b.astype(np.float32),np.zeros_like(b,dtype=np.float32))
    # products exact in fp64, each mma's k=8 chunk summed then added in fp32 (approximates order)
    out=np.zeros((a.shape[0],b.shape[1]),np.float32)
    for k0 in range(0,a.shape[1],8):
        sl=slice(k0,k0+8)
        for x,y in ((as_,bb),(ab,bs),(ab,bb)):
            out=(out+(x[:,sl].astype(np.float64)@y[sl].astype(np.float64)).astype(np.float32)).astype(np.float32)
    return out
rng=np.random.default_rng(1)  # second check
worst=0
for S in [37,60,72,96,128]:
    for trial in range(3):
        q=(rng.standard_normal((S,64))*0.5).astype(np.float32); k=(rng.standard_normal((S,64))*0.5).astype(np.float32); v=(rng.standard_normal((S,64))*0.5).astype(np.float32)
        bias=(rng.standard_normal((S,S))*2).astype(np.float32)
        s=(bias+mm3(q,k.T)).astype(np.float32)
        m=s.max(1,keepdims=True); p=np.exp(s-m).astype(np.float32); sm=p.sum(1,keepdims=True,dtype=np.float32)
        o=mm3(p,v)/sm
        sd=q.astype(np.float64)@k.T.astype(np.float64)+bias; pd=np.exp(sd-sd.max(1,keepdims=True)); pd/=pd.sum(1,keepdims=True); ref=pd@v.astype(np.float64)
        err=np.abs(o-ref).max()/max(1,np.abs(ref).max()); worst=max(worst,err)
    print(S,'rel err',err)
print('worst',worst,'(tolerance 1e-5)')
