/* zeroout DEV OFFSET LEN: BLKZEROOUT ioctl (issues VIRTIO_BLK_T_WRITE_ZEROES when offered). */
#include <fcntl.h>
#include <linux/fs.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/ioctl.h>
#include <unistd.h>

int main(int argc, char **argv) {
    if (argc != 4) {
        fprintf(stderr, "usage: zeroout DEV OFFSET LEN\n");
        return 2;
    }
    int fd = open(argv[1], O_WRONLY);
    if (fd < 0) {
        perror("open");
        return 1;
    }
    uint64_t range[2] = {strtoull(argv[2], 0, 0), strtoull(argv[3], 0, 0)};
    if (ioctl(fd, BLKZEROOUT, range) != 0) {
        perror("BLKZEROOUT");
        return 1;
    }
    close(fd);
    return 0;
}
